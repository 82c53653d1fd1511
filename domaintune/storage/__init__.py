"""Storage layer: the content-addressed store (``store``), the cross-host locks and claims on
it (``coordination``) and the manifests stages hand each other (``manifests``)."""
