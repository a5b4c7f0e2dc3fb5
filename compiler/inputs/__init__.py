"""What a compile reads: the teacher (``teacher``, with ``hf_examples``, ``hf``, ``hf_files`` for Hugging
Face folders, and ``guard``), its data (``calibration``, ``corpus``, ``data``) and the memory it will
need (``memory``)."""
