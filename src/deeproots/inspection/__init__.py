"""Looking inside models: exact multiply-adds and parameters per layer of any ``nn.Module``
(:mod:`.costs`), and the inter-layer covariance and block-diagonal structure of a trained
network (:mod:`.covariance`, Appendix A.2). Both look inside through
:mod:`deeproots.capture`."""
