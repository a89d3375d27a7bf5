"""fed-nessa: federated, differentially private NESSA embedding aligners.

Speaker embeddings from a runtime model are mapped into an enrollment model's
space so that either model can be updated without re-enrolling anyone. The
aligner is trained on paired embeddings that never leave the devices.
"""

__version__ = "0.1.0"
