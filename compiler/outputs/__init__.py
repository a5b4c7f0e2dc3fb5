"""What a compile writes: the OUT folder (``outdir``, ``atomic``), the cache key (``cachekey``),
each student's files and reload record (``students_io``), the manifest and the report."""
