"""Test helpers shared by every test folder: ports, prebuilt bundles, adapters, device daemons.

Imported as ``tests.helpers`` (pytest puts the repository root on ``sys.path``). Nothing here
imports ``onnx`` or ``plasma.server``: the edge tests use it and must run on a device's
dependencies.
"""
