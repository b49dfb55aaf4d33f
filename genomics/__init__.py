"""DNA sequence classification on neural memory (see issue: genomics)."""
