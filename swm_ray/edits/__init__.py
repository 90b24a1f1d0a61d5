"""Pure tensor edits of a decoder stack: merging windows, width slicing, folding compensation fits."""
