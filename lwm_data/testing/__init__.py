"""What tests, benchmarks and the demo share, and no stage imports: seeded synthetic books (books) and
media (media), real models from registry packages (models), and the in-memory reference packer (packing).
"""
