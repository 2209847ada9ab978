"""Data files shipped with the client: PyRadiomics parameter files (located with
importlib.resources, see fedmets.client.radiomics_features.params_file)."""
