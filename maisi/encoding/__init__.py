"""Encoding CT images or label masks into latents, the library behind ``maisi.encode``: one case
(``cases``) and the restartable run over a datalist (``run``)."""
