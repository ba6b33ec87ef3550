"""The data layer: pixels in and out (`images`), labelled image sources and their grain pipeline
(`sources`), pre-extracted code records (`codes`)."""
