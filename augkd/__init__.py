"""augkd: AuG-KD (anchor-based mixup generation for out-of-domain knowledge distillation) with fused ops."""

__version__ = "0.1.0"
