from typing import Any

DE_BRUIJN: int

def add_trees(
    bins: Any, offsets: Any, features: Any, masks: Any, values: Any, raw: Any
) -> None: ...
