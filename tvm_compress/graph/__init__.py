"""Graph analysis on Relax: dataflow views, channel groups and flow, the quantization graph."""
