from cl_agent.entry import main

main()
