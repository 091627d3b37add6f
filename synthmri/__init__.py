"""SynthMRI: learn from brain MRI volumes and publish versioned synthetic MRI data sets."""

__version__ = "0.1.0"
