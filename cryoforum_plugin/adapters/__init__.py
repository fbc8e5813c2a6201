"""Front-end adapters inside the package (the RELION one lives at the top level, relion_external/): each
translates one program's job contract into ``jobs`` calls and the results back, and computes nothing itself."""
