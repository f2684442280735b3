"""The paper's analytics and the offline testbeds, beside progrpo.py: they import it, it never imports them."""
