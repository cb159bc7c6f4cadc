"""The paper's printed tables (:mod:`.tables`) and deeproots' counts beside them
(:mod:`.compare`): ``deeproots table``."""
