"""The milestone models (installed as ``dlcore.models``), each built from dlcore layers with a ``stock=True``
pure-torch twin sharing its state_dict. Models register themselves for ``dlcore train`` / ``dlcore profile``."""
