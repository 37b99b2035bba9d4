"""The detection model at runtime: networks, losses, scoring (GMM, ensemble), bundles, detector.

Heavy imports (torch, timm, scikit-learn) happen in the submodules, not here.
"""
