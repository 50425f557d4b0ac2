"""``segment``: 3D segmentation with a model chosen by its card (3D U-Net or UNet++).

Torch-free modules: :mod:`.card` (model cards, installed models), :mod:`.params` and
:mod:`.geometry` (numpy). Torch modules: :mod:`.networks`, :mod:`.inference`, :mod:`.pipeline`.
"""
