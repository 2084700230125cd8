"""Exactly what an export carries (diffusers style): the JeDi pipelines, the references and set planning they
use, and the bundle that copies this code into every export."""
