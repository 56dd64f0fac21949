"""Evaluation of pre-trained encoders: k-NN, linear probe, fine-tuning, and the data they share."""
