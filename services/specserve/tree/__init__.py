from .token_tree import ROOT, Coupling, Proposal, TokenTree

__all__ = ["ROOT", "Coupling", "Proposal", "TokenTree"]
