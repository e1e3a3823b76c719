"""BonjourGrid: idle desktops found over mDNS, recruited on the fly, handed back."""

__version__ = "0.1.0"
