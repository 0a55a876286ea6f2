from .full_attn import sparse_scaled_dot_product_attention  # noqa: F401
