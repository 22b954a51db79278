"""Training: contrastive losses (``losses``), the LR schedule (``schedule``) and CLIP training (``clip``).

Import the submodules directly (``from core.train.clip import train_clip``); this package file stays
light so that importing it does not pull in torch.
"""
