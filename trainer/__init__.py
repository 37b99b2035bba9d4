"""stream-asd trainer job: data selection, training of the ensemble, evaluation, publishing.

Uses the runtime's model, features and registry (``stream_asd``); the runtime never imports this.
"""

import os as _os

# On a shared, oversubscribed CPU, OpenMP's default busy-wait makes torch's intra-op threads
# spin for descheduled peers: measured here a GhostNetV2 training step took 8-25 s with 2 threads
# instead of 0.16-0.3 s with OMP_WAIT_POLICY=PASSIVE. Must be set before torch loads OpenMP.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
