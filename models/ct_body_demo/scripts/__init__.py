"""Scripts of the ct_body_demo bundle: phantom generation and training."""
