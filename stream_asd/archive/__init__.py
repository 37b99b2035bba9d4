"""Archive of normal audio for retraining: writer (Kafka -> FLAC), store (folder or object
storage), reader (FLAC segments -> training clips)."""
