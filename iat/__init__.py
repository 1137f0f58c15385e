"""ImageNet adversarial training and robustness evaluation (the package behind ``main.py``).

One module per decision; the map is in README.md ("Layout"). Importing the package imports
nothing heavy: the data-server side (``iat.data.layouts``, ``augment``, ``sampling``,
``protocol``, ``client``, ``server``) never imports torch.
"""
