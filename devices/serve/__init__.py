"""``edgekt serve``: the on-device HTTP service around the torch-free runtime.

Layout (one job per module):

* :mod:`~edgekt.devices.serve.inputs`: limits, label validation and safe image/array decoding;
* :mod:`~edgekt.devices.serve.service`: the loaded package, the single writer of the device
  state (few-shot and continual), hot reload with a compatibility check; no HTTP in it;
* :mod:`~edgekt.devices.serve.metrics` and :mod:`~edgekt.devices.serve.events`: Prometheus
  metrics and optional MQTT events, both fed by the service's event stream;
* :mod:`~edgekt.devices.serve.app`: the FastAPI application (JSON API, OpenAPI, the page).

Only ``app``, ``metrics`` and ``events`` need the ``edgekt[serve]`` extra; importing this
package (and ``edgekt.devices``) does not.
"""
