"""CT generation, the library behind ``maisi.infer``: the plan of a run (``plan``), its inputs (``inputs``),
the memory it needs (``memory``), the files it writes (``files``) and the restartable run over every
input and seed (``run``)."""
