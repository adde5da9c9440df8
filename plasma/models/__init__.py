"""The shipped policy bundles: package data, one directory per bundle, installed with Plasma.

Each directory is a bundle (``plasma.protocol.bundle``: ``manifest.json`` naming its ``env_id``
and ``physics``, ``model.int8.onnx``, ``model.fp32.onnx``, ``base_weights.npz``), usually with
``policy.npz`` (the fp32 policy it was exported from), ``SCORE.json`` (how it scores, how it was
made) and, for a policy imported from Stable-Baselines3, the SB3 ``sac.zip`` it came from. They
are the base policies the quick start, the demo and the benches start from, and the oracles
(policies trained for a shifted physics) the benches compare against.

Nothing here is code: ``plasma.protocol.catalog`` finds the bundles through
``importlib.resources`` (from a wheel as from a checkout) and adds a user's own directories
(``PLASMA_MODELS``, ``--models-dir``); ``plasma-server models list`` shows them. A new bundle is
a new directory with a ``manifest.json`` (``plasma-server train-base --out plasma/models/NAME``
or ``plasma-server import-policy ... --out plasma/models/NAME``); ``pyproject.toml``'s package
data ships every ``*/*.json``, ``*/*.onnx``, ``*/*.npz`` and ``*/*.zip`` under it.
"""

__all__: list[str] = []
