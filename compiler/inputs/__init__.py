"""What a compile reads: the teacher (``teacher``, ``hf``, ``guard``), its data (``data``) and the
memory it will need (``memory``)."""
