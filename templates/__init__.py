"""jinja2 templates of LLVM IR (``*.ll.j2``), shipped as package data of dfpgen."""
