"""Helpers every pipelines layer shares and no entry point owns: the project's default paths
(``paths``) and the token-authenticated connection to Ray (``ray_auth``)."""
