"""Run directories on disk: checkpoint layout, manifests, resume scan, background writes, export, starting weights."""
