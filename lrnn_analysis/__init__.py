"""lrnn-analysis: certify, measure and draw the stability, curvature and robustness of continuous-time RNNs."""
__version__ = "0.1.0"
