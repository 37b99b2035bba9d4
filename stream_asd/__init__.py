"""stream-asd: real-time anomalous machine sound detection on Kafka (runtime package).

Parts, bottom floor first: ``config``/``wire``/``metrics``; ``audio`` (I/O, features, synth);
``model`` (networks, scoring, bundle, runner); ``producer``; ``registry``; ``processor``.
Nothing here imports the ``trainer`` package: the model bundle is the only contract.
"""

__version__ = "0.1.0"
