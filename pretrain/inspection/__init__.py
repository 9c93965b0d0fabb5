"""The paper's model inspection (Figures 6 and 7): `vit-inspect`."""
