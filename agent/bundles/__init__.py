"""Signed firmware bundles: one file that updates a device's agent code, models, plans and config.

See docs/bundles.md for the format, the tooling and the install / health-gate / rollback cycle.
Modules: ``manifest`` (manifest.json schema), ``signing`` (Ed25519 keys and signatures),
``archive`` (writing and the verifying stream reader), ``target`` (this device's board and
versions), ``build`` (``bundle build``), ``slots`` (A/B slots and ``state.json``), ``install``
(the installer), ``download`` (URL installs), ``boot`` (slot selection at start, boot attempts,
rollback) and ``gate`` (the health gate that commits a new version).
"""
