"""Networks: shared blocks, the VQ-GAN (encoder, quantizer, decoder) and its discriminators."""
