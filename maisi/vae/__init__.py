"""The autoencoder's encode and decode: whole-volume, sliding-window or exact tiles (``codec``), the tiled
streaming engine (``tiled``) and its slab storage (``storage``), and the one adapter that reads MONAI's
``AutoencoderKlMaisi`` structure for it (``monai_adapter``)."""
