//! The FLUX autoencoder (16-channel latents, 8× downsampling): encoder and decoder, CPU reference.
