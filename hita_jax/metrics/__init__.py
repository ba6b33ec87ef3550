"""The metrics layer: ADM generation metrics (`adm`), reconstruction PSNR/SSIM (`image`), batched
Inception features (`inception_features`), FLOPs and MFU accounting (`flops`)."""
