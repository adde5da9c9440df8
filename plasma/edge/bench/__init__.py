"""Edge benchmarks (``plasma-edge bench``): the runtime's act and merge paths, packet checks, and the
resident memory of a running daemon. Each prints one JSON object; none needs server code."""

__all__: list[str] = []
