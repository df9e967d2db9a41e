"""The UNITER trunk (``model``) and its checkpoint key maps (``checkpoint_keys``)."""
