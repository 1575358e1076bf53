"""LWM's vision token layout, defined once (docs/lwm-format.md): what the VQ-GAN, the sequence
builders, the checks and the trainer all agree on.

A frame is 256x256 RGB pixels; the VQ-GAN turns it into 16x16 codes in [0, 8192). In a token sequence
each frame's 256 codes are followed by <eof> (8192), except the last frame's, followed by <eov> (8193);
the block is wrapped in the text `<vision>` ... `</vision>`. The model's vision embedding and head have
8448 = 8192 + 256 entries, <eof> and <eov> among them.

Plain constants, no imports: the trainer imports this module.
"""

FRAME_PIXELS = 256  # frames are FRAME_PIXELS x FRAME_PIXELS RGB
CODES_SIDE = 16  # the VQ-GAN downsamples 16x: CODES_SIDE x CODES_SIDE codes a frame
TOKENS_PER_FRAME = CODES_SIDE * CODES_SIDE  # 256
CODEBOOK_SIZE = 8192  # vision codes are 0 .. CODEBOOK_SIZE - 1
END_OF_FRAME = 8192  # <eof>: after every frame but the last
END_OF_VISION = 8193  # <eov>: after the last frame
VISION_VOCAB_SIZE = 8448  # LWM's vision embedding and head
VISION_START, VISION_END = "<vision>", "</vision>"  # the text around a vision block
