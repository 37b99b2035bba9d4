"""stream-asd trainer job: data selection, training of the ensemble, evaluation, publishing.

Uses the runtime's model, features and registry (``stream_asd``); the runtime never imports this.
"""
