"""KV-cache presses: H2O, L2 norm and NAMM (evolved eviction)."""
