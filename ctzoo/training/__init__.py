"""Training pipelines (MONAI, torch.distributed); empty until the training issues land."""
