"""Built-in adapters, one module per framework.

``BUILTINS`` lists (module, framework it needs): a framework's adapter module is imported
only once that framework is imported by the program, so ``import lattice`` stays light.
Each module registers its adapters (and array codecs) into the default registry on import.
"""

BUILTINS: list[tuple[str, str | None]] = [
    ("lattice.adapters.python", None),
    ("lattice.adapters.torch", "torch"),
    ("lattice.adapters.tensorflow", "tensorflow"),
    ("lattice.adapters.jax", "jax"),
]
