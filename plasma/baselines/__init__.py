"""Baselines that need PyTorch and Stable-Baselines3 (``pip install 'plasma[baselines]'``).

Used by base- and oracle-policy training scripts and by ``bench live --baseline sb3-sac``;
never by a device or by the server's round (a test checks neither imports torch).
"""

__all__: list[str] = []  # the code is in plasma.baselines.sb3, imported only when asked for
